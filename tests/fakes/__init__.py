"""Hand-computable fakes for engine and scheduler tests (no accelerator, no jax)."""

from tests.fakes.fake_runner import FakeRunner, collect, drive, next_token, reference_generate

__all__ = ["FakeRunner", "collect", "drive", "next_token", "reference_generate"]
