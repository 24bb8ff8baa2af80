#!/bin/sh
# L2 guest script of the `sigterm` scenario: keeps the guest busy doing nothing so that the
# VMM is killed (SIGTERM) while the guest runs. Exiting on its own would be a test failure.
echo "GUEST-SLEEPING"
sleep 60
echo "GUEST-WOKE-UP"
exit 0
