"""Running a model on more than one device: device-map placement and offload (device_map.py,
offload.py), tensor parallel (tensor_parallel.py). Applied from outside the model code."""
