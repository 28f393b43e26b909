"""Classification heads for very many identities (Partial FC first)."""
