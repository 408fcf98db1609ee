// gemm: placeholder, to be written
#pragma once
