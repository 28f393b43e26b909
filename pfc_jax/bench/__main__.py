from pfc_jax.bench import main

main()
