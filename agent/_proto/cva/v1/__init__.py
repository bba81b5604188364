"""Generated code (make proto); do not edit."""
