"""Generated messages and stubs of medusa.v1."""
