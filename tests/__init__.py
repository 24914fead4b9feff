"""The test suite, laid out like the package (model/, data/, io/, training/, distributed/, tools/) plus e2e/."""
