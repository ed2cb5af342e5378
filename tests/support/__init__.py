"""What tests and benchmarks import that is not shipped (the package's demo/ never imports it)."""
