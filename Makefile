# The two set-up commands of the README: each installs what it needs, then runs.
.PHONY: demo test

# The demo runs on the default backend (JAX), or on the one KERAS_BACKEND names.
demo:
	bash scripts/setup.sh
	keras-clip-it demo

test:
	bash scripts/setup.sh test
	bash scripts/test.sh
