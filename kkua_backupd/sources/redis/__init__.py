"""Redis and Valkey: the protocol, our RDB reader, value encodings, backup, restore and the logical copy."""
