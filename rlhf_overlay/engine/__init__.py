"""Upstream engine: upstream.lock, clone + overlays (setup_engine), the upstreams' own tests, hub stand-ins."""
