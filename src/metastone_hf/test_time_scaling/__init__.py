"""The test-time-scaling metrics as a Hugging Face ``evaluate`` metric module (``test_time_scaling.py``).

Load it with ``evaluate.load(str(metastone_hf.metrics.evaluate_module_path()))``; ``evaluate`` imports the file
itself, so nothing is imported here.
"""
