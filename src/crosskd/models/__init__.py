"""Models: loading teachers and students by spec (`loading`), their vocabulary facts (`vocab`), MoE router
statistics (`moe`), and the reference pair built by `crosskd setup-models` (`reference`). See docs/MODELS.md."""
