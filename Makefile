# The two set-up commands of the README: each installs what it needs, then runs.
.PHONY: demo test

demo:
	bash scripts/setup.sh
	keras-clip-it demo

test:
	bash scripts/setup.sh test
	bash scripts/test.sh
