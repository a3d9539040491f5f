/* N getppid(2) calls: the cheapest syscall there is (it reads current->real_parent),
 * so the cost of the probes on the syscall path dominates. syscall(SYS_getppid) and not
 * getppid(): a libc may cache or inline it. Compiled by bench/overhead.py at run time. */
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    return 0;
}
