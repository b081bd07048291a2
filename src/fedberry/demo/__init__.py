"""The Fashion-MNIST demos (torch, Keras, MPI), their reference models and the table printer.

Nothing below ``demo`` imports it: the demos are users of fedberry, like a user's own script.
"""
