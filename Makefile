# The two set-up commands of the README: each installs what it needs, then runs.
.PHONY: demo test

# The demo only runs inference on the CPU, where TensorFlow runs EfficientNet-Lite0 several times faster
# than XLA:CPU (benchmarks/results/encoders.md); a KERAS_BACKEND set by the caller still wins.
demo:
	bash scripts/setup.sh
	KERAS_BACKEND=$${KERAS_BACKEND:-tensorflow} keras-clip-it demo

test:
	bash scripts/setup.sh test
	bash scripts/test.sh
