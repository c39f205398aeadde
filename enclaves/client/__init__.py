"""The Enclaves client: connection, end-to-end layer, keystore and line-mode UI."""
