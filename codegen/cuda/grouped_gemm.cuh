// grouped_gemm: placeholder, to be written
#pragma once
