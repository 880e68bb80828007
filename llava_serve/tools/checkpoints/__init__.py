"""Random-weight checkpoints for tests and benchmarks: HF layouts (`hf`), original LLaVA (`original`),
and the `llava-serve build-model` command (`build`)."""
