# Two entry points for a newcomer: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-yolov8n test venv baseline baseline-yolov8n lint clean readme-check

$(STAMP): requirements-dev.txt setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m trt_qat run --config configs/demo.yaml
	$(PY) tools/readme_results.py --check

# The second demo: an Ultralytics YOLOv8n (committed weights) through the same pipeline; report in reports/yolov8n-digits/
demo-yolov8n: $(STAMP)
	$(PY) -m trt_qat run --config configs/yolov8n-digits.yaml
	$(PY) tools/readme_results.py --check --block yolov8n-digits --report reports/yolov8n-digits/report.json

# README's results block against the last `make demo` (reports/demo/report.json); --write regenerates it.
readme-check: $(STAMP)
	$(PY) tools/readme_results.py --check

test: $(STAMP)
	$(PY) -m pytest -q

# Re-create the committed FP32 baseline (weights/yolo-n_digits-det.pt) from scratch.
baseline: $(STAMP)
	$(PY) -m trt_qat make-data --out datasets/digits-det
	$(PY) -m trt_qat train --data datasets/digits-det/data.yaml --model yolo-n --epochs 30 \
		--threads 1 --eval-every 5 --out weights/yolo-n_digits-det.pt

# Re-create the committed YOLOv8n baseline (weights/yolov8n_digits-det.pt): Ultralytics' yolov8n.yaml trained by
# trt_qat's loop with Ultralytics' own loss; best EMA weights stored in FP16.
baseline-yolov8n: $(STAMP)
	$(PY) -m trt_qat make-data --out datasets/digits-det
	$(PY) -m trt_qat train --data datasets/digits-det/data.yaml --model yolov8n.yaml --model-family ultralytics \
		--epochs 40 --imgsz 128 --batch 16 --threads 1 --eval-every 5 --half --out weights/yolov8n_digits-det.pt

lint: $(STAMP)
	$(VENV)/bin/ruff check trt_qat tests benchmarks tools

clean:
	rm -rf reports runs datasets calib/demo
