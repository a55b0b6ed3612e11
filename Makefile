# gsva_ros developer entry points. Nothing needs sourcing: everything runs from .venv.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
export VENV
PYTEST_ARGS ?=
ifeq ($(origin ROS_DOMAIN_ID),undefined)
ROS_DOMAIN_ID := $(shell shuf -i 1-100 -n 1)
endif

# DDS traffic stays on this machine, in a private domain; LARGE_DATA makes big images fast.
TEST_ENV := ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=$(ROS_DOMAIN_ID) \
	FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA PYTHONUNBUFFERED=1

.PHONY: setup test demo lint clean

setup:
	bash scripts/setup_env.sh

test: setup
	$(TEST_ENV) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/gsva-ros demo

lint: setup
	$(VENV)/bin/ruff check gsva_ros test experiments setup.py

clean:
	rm -rf build/
