"""The command-line layer: thin Typer commands over the core modules. No logic lives here."""
