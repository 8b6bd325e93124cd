"""Networks: backbone families by name, the small CNN, the two-head network and its pretrained
weights, and what the model sees (transforms, normalisation, model input).
Layer 7 of avgk: may import avgk.evaluation and the layers below it (method, data, records, config, runtime).
"""
