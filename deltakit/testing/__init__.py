"""Test helpers shipped with deltakit: a local Hugging Face Hub-compatible server (`deltakit.testing.hub`)."""
