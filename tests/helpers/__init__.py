"""What tests share besides fixtures (those stay in conftest.py): project paths and the
shared data, data files written on the fly, run-directory readers, the S3 test server's
settings, and the stand-in second device."""
