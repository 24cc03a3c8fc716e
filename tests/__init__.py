"""attnrt tests: a package, so tests/kernels never answers `import kernels`."""
