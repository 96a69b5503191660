"""Generation: sampling, prompt preparation, the decode core (prefill and one decode step, shared with the serving
engine), `generate` / `generate_stream`, `Chat`, and image and video inputs."""
