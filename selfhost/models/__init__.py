"""Model management: names (resolve), the registry, the Hub client, downloads, pull and the store."""
