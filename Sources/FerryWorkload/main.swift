// placeholder: replaced below
print("ferry-workload")
