# edge-rt: `make demo` runs the main job on the default model; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export EDGE_RT_HOME ?= $(HOME)/.cache/edge-rt
DEMO_MODEL := $(EDGE_RT_HOME)/converted/smollm2-135m-q4.gguf
C_SOURCES  := $(shell find kernels_c -name '*.[ch]') CMakeLists.txt

.PHONY: setup demo test peer cross valgrind clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(C_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(DEMO_MODEL): edge_rt/formats.py | setup  # remade when the layout may have changed
	mkdir -p $(dir $@)
	$(BIN)/edge-rt pull smollm2-135m
	$(BIN)/edge-rt convert smollm2-135m -o $@ --bits 4

demo: setup $(DEMO_MODEL)
	$(BIN)/edge-rt run $(DEMO_MODEL) --chat --prompt "What is the capital of France?" -n 64 --mem-budget 2GB

peer: setup
	bash scripts/peer.sh $(VENV)

# cross compilers and qemu-user for the kernel tests under qemu (Debian packages): aarch64
# (NEON, dotprod), armv7 hard-float (arm-linux-gnueabihf, -mfpu=neon) and armv6 without NEON
# (arm-linux-gnueabi: Debian's armel runs on an ARMv6 core); the tests skip, saying why,
# where they cannot be installed
CROSS_TOOLS := aarch64-linux-gnu-gcc arm-linux-gnueabihf-gcc arm-linux-gnueabi-gcc qemu-aarch64 qemu-arm
cross:
	@(for t in $(CROSS_TOOLS); do command -v $$t >/dev/null || exit 1; done) || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf \
	       gcc-arm-linux-gnueabi qemu-user >/dev/null) || \
	    echo "make cross: cross compilers or qemu-user missing; the qemu kernel tests will skip"; }

# valgrind for the memcheck in tests/test_sanitize.py (Debian package); the test skips without it
valgrind:
	@command -v valgrind >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && apt-get install -y -qq valgrind >/dev/null) || \
	    echo "make valgrind: cannot install valgrind; the memcheck test will skip"; }

test: setup peer cross valgrind
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build _skbuild
