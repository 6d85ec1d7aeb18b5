"""Building blocks written once and shared by every model family."""
