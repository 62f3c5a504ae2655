"""khd: the service interface (admission control, management, hardware configuration)."""
