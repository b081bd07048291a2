"""The fedberry wire protocol, sans-IO: frames, messages, limits and authentication.

Nothing in this package touches a socket, a thread or an event loop: ``frames`` turns bytes into
frames and back, ``auth`` holds the challenge + HMAC handshake's arithmetic. Transports move the
bytes.
"""
