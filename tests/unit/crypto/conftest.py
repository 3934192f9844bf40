"""Fixtures for the crypto unit tests: a small federation made by our own PKI, in memory."""

import pytest

from securefl.crypto import pki
from securefl.crypto.simulate import federation


@pytest.fixture(scope="session")
def fed5():
    """A CA and five hospital credentials, shared by tests that only read them."""
    return federation(5)


@pytest.fixture(scope="session")
def other_ca():
    """A second, unrelated CA: its certificates must be refused everywhere."""
    ca = pki.make_ca("intruders")
    return ca, pki.issue(ca, pki.Role.HOSPITAL, "hospital-000")
