"""Selection: request, device, registry, capability check, manifest, dispatch, report."""
