from pfc_jax.export import main

main()
