from pfc_jax.convert import main

main()
