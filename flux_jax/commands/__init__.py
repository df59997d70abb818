"""One module per `flux-jax` subcommand (listed in `flux_jax.cli.COMMANDS`): `HELP`, `add_arguments`, `run`."""
