"""The transport seam: one interface, one module per way of moving bytes."""
