"""Weight transforms applied to trained models, one module per technique."""
