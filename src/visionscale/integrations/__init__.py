"""Plugins that expose visionscale pieces to other frameworks (imported only on request)."""
