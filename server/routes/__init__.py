"""HTTP routers of the API: videos, models, health and metrics."""
