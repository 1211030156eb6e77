"""Exit codes of ``edgefleet-runtime``: the operator reads a failed init container's code to name the problem."""

EXIT_USAGE = 2
EXIT_DIGEST = 3  # the fetched (or cached) bytes do not have the variant's digest
EXIT_LOAD = 4
EXIT_FETCH = 5  # the registry answered, but not with the variant (404, 401, bad manifest ...)
EXIT_SIGNATURE = 6  # unsigned or wrongly signed variant, refused by the trust policy
EXIT_DECRYPT = 7  # encrypted variant without the right decryption key
EXIT_UNREACHABLE = 8  # the registry did not answer (refused, timed out, 5xx) within the bounded retries
