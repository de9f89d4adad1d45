"""The fedfuse site side: the Flower ClientApp, private training, the site's privacy state."""
