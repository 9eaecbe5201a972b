"""The HDF5 embedding store: its layout and reading in row blocks (`layout`), atomic writing with resume (`writer`)."""
