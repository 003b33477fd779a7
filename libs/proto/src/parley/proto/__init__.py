"""Generated from proto/ by `make proto`; do not edit (contract.py is written by hand)."""
