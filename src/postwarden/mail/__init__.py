"""Building and checking messages that the appliance writes itself (API injection)."""
