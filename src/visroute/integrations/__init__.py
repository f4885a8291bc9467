"""Adapters that plug visroute into other tools: `visroute.integrations.lmms` is an lmms-eval model."""
