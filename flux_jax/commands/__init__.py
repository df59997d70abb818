"""One module per `flux-jax` subcommand (discovered by `flux_jax.cli`)."""
