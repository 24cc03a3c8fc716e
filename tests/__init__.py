"""attnrt tests (a package, so tests/kernels is tests.kernels and never answers `import kernels`)."""
