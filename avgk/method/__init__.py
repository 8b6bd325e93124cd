"""The method, free of networks and loops: the training losses (avgk.method.losses), the exact
average-K thresholds lambda_K in memory and streamed, and the pseudo-label rules and their stored table.
Layer 5 of avgk: may import avgk.data, avgk.records, avgk.config and avgk.runtime, nothing above them.
"""
