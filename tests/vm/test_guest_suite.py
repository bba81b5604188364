"""The VM suite: one guest boot runs tests/guest; see tests/vm/conftest.py and README.md."""

from tests.vm.conftest import GuestSuite

guest = GuestSuite()
