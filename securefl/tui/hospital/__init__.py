"""The hospital staff's app: log in, dashboard, train, send, get + evaluate, classify, history."""
